//! What answers and relays: the HTTP wire pieces, the glommio backend, the L4 balancer with its
//! health checks, and the thread-per-connection server.

pub mod backend;
pub mod balancer;
pub mod health;
pub mod http;
pub mod threaded;
