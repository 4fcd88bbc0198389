//! Request replay and response peeking bodies.

mod json_end;
mod peek;
mod replay;
mod response;

pub(crate) use peek::{FirstLook, Unfinished, first_look, not_peekable, peek};
pub use replay::ReplayBody;
pub(crate) use replay::{NotReplayable, Replay};
pub use response::ResponseBody;
