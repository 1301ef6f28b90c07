//! ringlab: the networking performance lab on pinned glommio executors, as a library the `ringlab`
//! binary, the integration tests and the benchmarks all drive. Three layers, each a folder:
//! [`io`] (the runtime: executors, socket drivers, connections), [`serve`] (the servers and the
//! balancer) and [`lab`] (the client, the sweep and its results), with the command line on top.

pub mod cli;
pub mod commands;
pub mod io;
pub mod lab;
pub mod rng;
pub mod serve;
