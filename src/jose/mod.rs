//! JOSE pieces shared by client assertions and DPoP proofs: signing keys
//! ([`SigningKey`]) and the JWS compact serialization. The cryptography is
//! ring's; this module only encodes.

mod jws;
mod key;

pub(crate) use jws::{random_id, sha256_b64, sign_compact, unix_now};
pub use key::{KeyError, SigningKey};
