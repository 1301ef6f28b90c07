//! What answers and relays: the HTTP wire pieces (the lab server's and the proxy's framing), the
//! glommio backend, the balancer (TCP and HTTP modes) with its policies and health checks, and
//! the thread-per-connection server.

pub mod backend;
pub mod balancer;
pub mod h1;
pub mod health;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod threaded;
