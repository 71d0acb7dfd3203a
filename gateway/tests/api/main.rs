//! Integration tests: the real server on random ports against the real PostgreSQL and
//! Redis. Each test gets its own database and Redis key prefix, so tests run in
//! parallel and leave nothing behind.

// The harness is one crate: `pub` here means "for the sibling test modules"; and a
// failed step in a test should panic with its location, which is what unwrap does.
#![allow(unreachable_pub, missing_debug_implementations, clippy::unwrap_used)]

mod access_log;
mod backend_tls;
mod cache;
mod cli;
mod coherence;
mod config;
mod deploy;
mod differential;
mod docs;
mod errors;
mod fault;
mod fleet;
mod front;
mod hardening;
mod health;
mod helpers;
mod items;
mod openapi;
mod otlp;
mod proxy;
mod proxy_hardening;
mod raw;
mod replica;
mod rolling;
mod shutdown;
mod startup;
mod terraform;
mod tls;
mod upstream;
