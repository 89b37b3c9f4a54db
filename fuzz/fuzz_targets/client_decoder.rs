//! The frame decoder of the client link, both directions (what the gateway
//! reads from clients, and what the SDK reads from the gateway), on input
//! cut into arbitrary chunks: no panic, the same frames and error however
//! the bytes arrive, `needed()` within its bound, and frames that encode
//! back to the bytes they came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slg_gateway::protocol::Link;

fuzz_target!(|data: &[u8]| {
    slg_gateway_fuzz::check_decoder(data, [Link::ClientToGateway, Link::GatewayToClient]);
});
