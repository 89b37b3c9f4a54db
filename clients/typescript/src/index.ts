// slg-gateway-client: the client side of the slg-gateway client link.
export { GatewayClient, redirected } from "./client.js";
export { LoginError, RequestError } from "./types.js";
export type { ClientEvents, ClientOptions, GapInfo, KickInfo, Push, Response, SessionInfo } from "./types.js";
export { Code, codeName, encodeFrame, FrameDecoder, FrameError, GAP, Kind, parseRedirect, parseSession } from "./frame.js";
export type { Frame, Header } from "./frame.js";
export type { Endpoint, TlsOptions, Transport, WebSocketCtor, WebSocketLike } from "./transport.js";
