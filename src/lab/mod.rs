//! What measures and records: the load generator and its printing, the in-process topology, the
//! sweep, the results folder with its chart, and the machine facts every result carries.

pub mod chart;
pub mod client;
pub mod curves;
pub mod diff;
pub mod hgrm;
pub mod hosts;
pub mod machine;
pub mod merge;
pub mod netlab;
pub mod pacer;
pub mod placed;
pub mod report;
pub mod results;
pub mod sweep;
pub mod target;
pub mod topology;
