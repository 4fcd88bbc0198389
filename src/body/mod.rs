//! Request replay and response peeking bodies.

mod json_end;
mod peek;
mod replay;

pub use peek::ResponseBody;
pub(crate) use peek::{not_peekable, peek};
pub use replay::ReplayBody;
pub(crate) use replay::{NotReplayable, Replay};
