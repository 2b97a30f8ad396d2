// FORGE client runtime: typed RPC over POST /rpc/{function} and live queries over /ws.
// Copied unchanged next to the generated api.ts by `forge-node generate ts`; needs nothing but
// fetch and WebSocket (browsers, Node 22+, or Node 20 with --experimental-websocket).

// --- wire types -----------------------------------------------------------------------------
declare const brand: unique symbol;
/** A string with a meaning the server checks (a UUID, an ISO 8601 timestamp, ...). */
export type Brand<T, B extends string> = T & { readonly [brand]: B };
export type UUID = Brand<string, "UUID">;
/** ISO 8601 date and time, as Python's datetime.isoformat() writes it. */
export type DateTime = Brand<string, "DateTime">;
/** ISO 8601 date (YYYY-MM-DD). */
export type DateString = Brand<string, "Date">;
/** A decimal number as a string ("12.50"): no float rounding on the way. */
export type Decimal = Brand<string, "Decimal">;
/** Bytes, base64-encoded. */
export type Base64 = Brand<string, "Base64">;

export const uuid = (s: string): UUID => s as UUID;
export const dateTime = (d: Date | string): DateTime => (typeof d === "string" ? d : d.toISOString()) as DateTime;
export const dateString = (s: string): DateString => s as DateString;
export const decimal = (s: string): Decimal => s as Decimal;
export const base64 = (s: string): Base64 => s as Base64;

// --- errors ---------------------------------------------------------------------------------
/** Every error code FORGE documents (DESIGN §7), with the HTTP status each travels with. */
export const ERROR_STATUS = {
  INVALID_ARGUMENT: 400,
  UNAUTHENTICATED: 401,
  FORBIDDEN: 403,
  NOT_FOUND: 404,
  CONFLICT: 409,
  PAYLOAD_TOO_LARGE: 413,
  RATE_LIMITED: 429,
  INTERNAL: 500,
  UNAVAILABLE: 503,
  TIMEOUT: 504,
} as const;
export type ErrorCode = keyof typeof ERROR_STATUS;

export interface ArgumentProblem { argument: string; message: string }
/** What `details` holds for each code (null when the server sends none). */
export interface ErrorDetails {
  INVALID_ARGUMENT: ArgumentProblem[] | null;
  UNAUTHENTICATED: unknown;
  FORBIDDEN: unknown;
  NOT_FOUND: unknown;
  CONFLICT: unknown;
  PAYLOAD_TOO_LARGE: { limit: number } | null;
  RATE_LIMITED: { retry_after?: number; limit?: number; rate?: number } | null;
  INTERNAL: { request_id?: string } | null;
  UNAVAILABLE: unknown;
  TIMEOUT: unknown;
}

/** An error a FORGE function call or subscription ended with. `status` is 0 when no HTTP answer came. */
export class ForgeError<C extends ErrorCode = ErrorCode> extends Error {
  readonly code: C;
  readonly details: ErrorDetails[C];
  readonly status: number;
  readonly requestId: string | null;

  constructor(code: C, message: string, details: ErrorDetails[C], status: number = ERROR_STATUS[code],
              requestId: string | null = null) {
    super(message);
    this.name = "ForgeError";
    this.code = code;
    this.details = details;
    this.status = status;
    this.requestId = requestId;
  }

  /** Narrows `details` to what the code carries: `if (err.is("RATE_LIMITED")) err.details?.retry_after`. */
  is<K extends ErrorCode>(code: K): this is ForgeError<K> {
    return (this.code as ErrorCode) === code;
  }
}

const isCode = (c: unknown): c is ErrorCode => typeof c === "string" && c in ERROR_STATUS;

function codeOfStatus(status: number): ErrorCode {
  for (const c in ERROR_STATUS) if (ERROR_STATUS[c as ErrorCode] === status) return c as ErrorCode;
  return status >= 500 ? "INTERNAL" : "INVALID_ARGUMENT";
}

/** A wire error object ({code, message, details}) as a ForgeError; an unknown code keeps its text. */
export function toError(e: unknown, status = 0, requestId: string | null = null): ForgeError {
  const o = (e && typeof e === "object" ? e : {}) as { code?: unknown; message?: unknown; details?: unknown };
  const code: ErrorCode = isCode(o.code) ? o.code : status ? codeOfStatus(status) : "INTERNAL";
  const message = typeof o.message === "string" ? o.message : `${String(o.code ?? "error")} (HTTP ${status})`;
  return new ForgeError(code, message, (o.details ?? null) as ErrorDetails[ErrorCode], status || ERROR_STATUS[code],
                        requestId);
}

// --- function references --------------------------------------------------------------------
export type Kind = "query" | "mutation" | "action";
/** A server function: its name, kind, argument object type A and result type R (types only). */
export interface FunctionRef<K extends Kind, A, R> {
  readonly name: string;
  readonly kind: K;
  readonly ref: FunctionRef<K, A, R>;
  /** never set: carries A and R for the type checker */
  readonly _types?: (args: A) => R;
}
export function fn<K extends Kind, A, R>(name: string, kind: K): FunctionRef<K, A, R> {
  const r = { name, kind } as { name: string; kind: K; ref: FunctionRef<K, A, R> };
  r.ref = r;
  return r;
}
/** The argument list of a call: optional when every argument has a default. */
export type Args<A> = {} extends A ? [args?: A] : [args: A];
/** A function bound to a client: `await api.todos.add({ title })`. */
export interface BoundFn<K extends Kind, A, R> {
  (...args: Args<A>): Promise<R>;
  readonly ref: FunctionRef<K, A, R>;
  readonly client: ForgeClient;
}
export type BoundQuery<A, R> = BoundFn<"query", A, R>;
export type Bound<T> = T extends FunctionRef<infer K, infer A, infer R> ? BoundFn<K, A, R>
  : { readonly [P in keyof T]: Bound<T[P]> };

/** Bind every function of a generated tree to `client`. */
export function bindApi<T extends object>(client: ForgeClient, tree: T): Bound<T> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(tree)) {
    const v = value as FunctionRef<Kind, unknown, unknown> | object;
    if ("ref" in v && (v as FunctionRef<Kind, unknown, unknown>).ref === v) {
      const ref = v as FunctionRef<Kind, unknown, unknown>;
      const call = (args?: unknown) => client.call(ref, args as never);
      out[key] = Object.assign(call, { ref, client });
    } else {
      out[key] = bindApi(client, v);
    }
  }
  return out as Bound<T>;
}

// --- the client ------------------------------------------------------------------------------
export type TokenSource = string | null | (() => string | null | Promise<string | null>);

export interface SocketLike {
  readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type SocketFactory = new (url: string) => SocketLike;

/** A message the node sends to dev clients (`forge-node dev`): a reload that worked or failed. */
export interface DevMessage {
  type: "dev";
  event: "reloaded" | "reload_failed";
  message: string;
  file?: string | null;
  line?: number | null;
  functions?: string[];
}

export interface ClientOptions {
  /** the node's HTTP base URL, e.g. "http://127.0.0.1:8080" */
  url: string;
  /** bearer credential (JWT or API key), or a function giving the current one */
  token?: TokenSource;
  /** the live-query endpoint; default: url with ws(s): and path /ws */
  wsUrl?: string;
  fetch?: typeof fetch;
  WebSocket?: SocketFactory;
  /** reconnect backoff bounds in ms (full jitter, doubling) */
  minBackoff?: number;
  maxBackoff?: number;
  /** ms between pings; a socket silent for pongTimeout ms after a ping is taken for dead */
  pingInterval?: number;
  pongTimeout?: number;
  /** ms a new socket may take to open before it is given up and tried again */
  openTimeout?: number;
  /** called with dev messages (reload results) from `forge-node dev` */
  onDev?: (msg: DevMessage) => void;
  /** called with errors that concern no subscription (a refused token, a malformed message) */
  onError?: (err: ForgeError) => void;
}

export interface LiveHandlers<R> {
  data: (value: R) => void;
  /** the subscription ended with this error (it is not retried) */
  error?: (err: ForgeError) => void;
}

interface Sub {
  id: string;
  name: string;
  args: unknown;
  hash: string | null;
  handlers: LiveHandlers<never>;
  sent: boolean;
}

const OPEN = 1;

export class ForgeClient {
  readonly url: string;
  readonly wsUrl: string;
  private opts: ClientOptions;
  private subs = new Map<string, Sub>();
  private nextId = 0;
  private ws: SocketLike | null = null;
  /** the socket is open and (when a token is used) authenticated */
  private live = false;
  private attempt = 0;
  private closed = false;
  private timers = new Set<ReturnType<typeof setTimeout>>();
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private pingTimer: ReturnType<typeof setInterval> | null = null;
  private pongDeadline: ReturnType<typeof setTimeout> | null = null;
  private openDeadline: ReturnType<typeof setTimeout> | null = null;
  /** sockets opened so far (1 + reconnects), for callers that watch the connection */
  connects = 0;

  constructor(opts: ClientOptions) {
    this.opts = opts;
    this.url = opts.url.replace(/\/+$/, "");
    this.wsUrl = opts.wsUrl ?? this.url.replace(/^http/, "ws") + "/ws";
  }

  private async token(): Promise<string | null> {
    const t = this.opts.token;
    return typeof t === "function" ? await t() : t ?? null;
  }

  /** Call a query, mutation or action over HTTP; rejects with a ForgeError. */
  async call<K extends Kind, A, R>(f: { readonly ref: FunctionRef<K, A, R> }, ...rest: Args<A>): Promise<R> {
    const headers: Record<string, string> = { "content-type": "application/json" };
    const token = await this.token();
    if (token) headers.authorization = `Bearer ${token}`;
    const doFetch = this.opts.fetch ?? fetch;
    let res: Response;
    try {
      res = await doFetch(`${this.url}/rpc/${f.ref.name}`, {
        method: "POST", headers, body: JSON.stringify(rest[0] ?? {}),
      });
    } catch (e) {
      throw new ForgeError("UNAVAILABLE", `cannot reach ${this.url}: ${String(e)}`, null, 0);
    }
    const requestId = res.headers.get("x-request-id");
    let body: { data?: unknown; error?: unknown } | null = null;
    try {
      body = await res.json();
    } catch {
      throw toError({ message: `HTTP ${res.status} without a JSON body` }, res.status || 500, requestId);
    }
    if (res.ok && body && "data" in body) return body.data as R;
    throw toError(body?.error, res.status, requestId);
  }

  /** Follow a query's result: `handlers.data` gets the first result and every changed one.
   *  Returns the function that ends the subscription. */
  subscribe<A, R>(q: { readonly ref: FunctionRef<"query", A, R> }, args: A, handlers: LiveHandlers<R>): () => void {
    const id = `s${++this.nextId}`;
    const sub: Sub = { id, name: q.ref.name, args: args ?? {}, hash: null, handlers: handlers as LiveHandlers<never>,
                       sent: false };
    this.subs.set(id, sub);
    if (this.live) this.sendSub(sub);
    else this.connect();
    return () => {
      if (this.subs.delete(id) && this.live && sub.sent) this.send({ type: "unsubscribe", id });
    };
  }

  /** Close the socket for good and stop every timer. */
  close(): void {
    this.closed = true;
    this.drop();
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.subs.clear();
  }

  // --- the socket -------------------------------------------------------------------------------
  private later(ms: number, f: () => void): ReturnType<typeof setTimeout> {
    const t = setTimeout(() => { this.timers.delete(t); f(); }, ms);
    this.timers.add(t);
    return t;
  }

  private send(msg: object): void {
    if (this.ws && this.ws.readyState === OPEN) this.ws.send(JSON.stringify(msg));
  }

  private sendSub(sub: Sub): void {
    sub.sent = true;
    const msg: Record<string, unknown> = { type: "subscribe", id: sub.id, function: sub.name, args: sub.args };
    if (sub.hash) msg.hash = sub.hash; // an unchanged result is answered with "unchanged", not resent
    this.send(msg);
  }

  private connect(): void {
    if (this.ws || this.closed) return;
    const Socket = this.opts.WebSocket ?? (globalThis as unknown as { WebSocket: SocketFactory }).WebSocket;
    const ws = new Socket(this.wsUrl);
    this.ws = ws;
    this.connects++;
    ws.onopen = () => { void this.opened(ws); };
    ws.onmessage = (ev) => { if (ws === this.ws) this.receive(ev.data); };
    ws.onclose = () => { if (ws === this.ws) this.lost(); };
    ws.onerror = () => { /* onclose follows */ };
    // a handshake that never completes (a dead network path) must not leave the client waiting forever
    this.openDeadline = this.later(this.opts.openTimeout ?? 10000, () => { if (ws === this.ws) this.lost(); });
  }

  private async opened(ws: SocketLike): Promise<void> {
    if (this.openDeadline) clearTimeout(this.openDeadline);
    this.heard();
    const interval = this.opts.pingInterval ?? 20000;
    this.pingTimer = setInterval(() => this.ping(), interval);
    let token: string | null = null;
    try {
      token = await this.token();
    } catch (e) {
      this.opts.onError?.(new ForgeError("UNAUTHENTICATED", `the token source failed: ${String(e)}`, null, 0));
    }
    if (ws !== this.ws) return;
    if (token) this.send({ type: "auth", token });
    else this.ready();
  }

  /** The socket may carry subscriptions: (re)send every one, with the last hash seen. */
  private ready(): void {
    this.live = true;
    this.attempt = 0;
    for (const sub of this.subs.values()) this.sendSub(sub);
  }

  private receive(raw: unknown): void {
    this.heard();
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(String(raw));
    } catch {
      return;
    }
    const sub = typeof msg.id === "string" ? this.subs.get(msg.id) : undefined;
    switch (msg.type) {
      case "ready":
        this.scheduleRefresh(msg.expires_at);
        if (!this.live) this.ready();
        return;
      case "data":
        if (sub) {
          sub.hash = msg.hash as string;
          sub.handlers.data(msg.data as never);
        }
        return;
      case "unchanged":
        if (sub) sub.hash = msg.hash as string;
        return;
      case "error": {
        const err = toError(msg);
        if (!sub) {
          this.opts.onError?.(err);
          // a refused token before the socket was ready: try again later, with a fresh token
          if (!this.live && err.code === "UNAUTHENTICATED") this.ws?.close(4001, "token refused");
          return;
        }
        const rate = (msg.details as { rate?: number } | null)?.rate;
        if (err.code === "RATE_LIMITED" && rate) {
          sub.sent = false; // refused by the subscribe rate: send again after a jittered pause
          this.later(Math.random() * 2000 / rate + 50, () => { if (this.live && this.subs.get(sub.id) === sub) this.sendSub(sub); });
          return;
        }
        this.subs.delete(sub.id);
        sub.handlers.error?.(err);
        return;
      }
      case "dev":
        this.opts.onDev?.(msg as unknown as DevMessage);
        return;
    }
  }

  private scheduleRefresh(expiresAt: unknown): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    if (typeof expiresAt !== "string" || typeof this.opts.token !== "function") return;
    const left = Date.parse(expiresAt) - Date.now();
    if (!(left > 0)) return;
    // refresh half-way through a short token, 30 s before a long one expires
    this.refreshTimer = this.later(left - Math.min(30000, left / 2), () => { void this.refresh(); });
  }

  private async refresh(): Promise<void> {
    const ws = this.ws;
    let token: string | null;
    try {
      token = await this.token();
    } catch (e) {
      this.opts.onError?.(new ForgeError("UNAUTHENTICATED", `the token source failed: ${String(e)}`, null, 0));
      return;
    }
    if (ws === this.ws && token) this.send({ type: "auth", token }); // answered by "ready"; subscriptions stay
  }

  // --- dead connections and reconnects --------------------------------------------------------------
  private heard(): void {
    if (this.pongDeadline) clearTimeout(this.pongDeadline);
    this.pongDeadline = null;
  }

  private ping(): void {
    if (!this.ws || this.ws.readyState !== OPEN) return;
    this.send({ type: "ping" });
    if (!this.pongDeadline) {
      this.pongDeadline = this.later(this.opts.pongTimeout ?? 10000, () => {
        this.pongDeadline = null;
        this.lost(); // nothing came back: the connection is dead even if TCP has not noticed
      });
    }
  }

  /** Forget the socket without waiting for it to close. */
  private drop(): void {
    const ws = this.ws;
    this.ws = null;
    this.live = false;
    if (this.pingTimer) clearInterval(this.pingTimer);
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    if (this.openDeadline) clearTimeout(this.openDeadline);
    this.heard();
    this.pingTimer = this.refreshTimer = this.openDeadline = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(1000, "client closed"); } catch { /* already closed */ }
    }
  }

  private lost(): void {
    this.drop();
    for (const sub of this.subs.values()) sub.sent = false;
    if (this.closed || this.subs.size === 0) return;
    const min = this.opts.minBackoff ?? 100;
    const max = this.opts.maxBackoff ?? 10000;
    const delay = Math.random() * Math.min(max, min * 2 ** this.attempt++); // full jitter
    this.later(delay, () => this.connect());
  }
}
