//! The I/O runtime under every server and the client: pinned executors, the socket drivers
//! (io_uring and epoll) behind one connection type, accepting, listening, deadlines, graceful
//! stop and process limits. Nothing here knows about HTTP or the lab.

pub mod accept;
pub mod conn;
pub mod deadline;
pub mod driver;
pub mod limits;
pub mod listen;
pub mod placement;
pub mod shutdown;
pub mod time;
