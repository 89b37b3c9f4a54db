//! The frame decoder of the backend link, both directions (what the gateway
//! reads from backends, and what a backend reads from the gateway), on
//! input cut into arbitrary chunks: the checks of `client_decoder`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slg_gateway::protocol::Link;

fuzz_target!(|data: &[u8]| {
    slg_gateway_fuzz::check_decoder(data, [Link::BackendToGateway, Link::GatewayToBackend]);
});
