"""The admin dashboard at ``/_forge/`` (plugin ``dashboard``, shipped with forge-observe)."""
