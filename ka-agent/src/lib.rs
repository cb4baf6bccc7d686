//! ka's agent: the user-space half of the data path (see docs/architecture.md).
//!
//! kernel programs → [`loader`] → [`decode`] → [`conntrack`] → [`classify`] → [`export`]

pub mod offsets;
