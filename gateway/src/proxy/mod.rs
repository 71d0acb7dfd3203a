//! The reverse proxy: routes that target an upstream group (or a weighted split between
//! groups) are forwarded here.
//!
//! # Layout
//! - [`group`]: a group's targets, balancer (round robin, weighted, least outstanding by
//!   power of two choices) and active health checks.
//! - `pool`: a group's keep-alive connections; HTTP/1.1 ones are driven by the request
//!   using them, not by a task of their own.
//! - [`target`]: one target's state: requests in flight, health verdict, passive
//!   ejection.
//! - [`split`]: weighted splits between groups (blue/green, canary), swapped atomically.
//! - `forward`: one request's way up and its answer's way down, as named steps.
//! - [`h1`]: the HTTP/1.1 upstream codec (response head and body framing).
//! - `headers`: hop-by-hop stripping, `X-Forwarded-*`, `Forwarded`, `Via`.
//! - `body`: streamed bodies: the request body a retry can take back, the response body
//!   under the request deadline.
//! - `budget`: the retry budget.
//! - `connector`: the pools' TCP connector, counting connections per target.
//! - [`tunnels`]: upgraded connections, tracked so shutdown can wait for them and then
//!   cut them.

mod body;
mod budget;
mod connector;
mod forward;
pub mod group;
pub mod h1;
mod headers;
mod pool;
pub mod split;
pub mod target;
pub mod tunnels;

pub use body::UpstreamBody;
pub(crate) use forward::{Prepared, ProxyRequest, forward, prepare};
pub use group::Group;
pub(crate) use headers::{ClientSide, client_authority};
pub use split::{Split, SplitError};
pub use target::Target;
pub use tunnels::Tunnels;
