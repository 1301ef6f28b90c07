//! ringlab: the networking performance lab on pinned glommio executors, as a library the `ringlab`
//! binary, the integration tests and the benchmarks all drive.

pub mod accept;
pub mod backend;
pub mod balancer;
pub mod chart;
pub mod cli;
pub mod client;
pub mod commands;
pub mod conn;
pub mod deadline;
pub mod health;
pub mod http;
pub mod limits;
pub mod listen;
pub mod machine;
pub mod placement;
pub mod readiness;
pub mod report;
pub mod results;
pub mod shutdown;
pub mod sweep;
pub mod threaded;
pub mod topology;
