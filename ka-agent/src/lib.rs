//! ka's agent: the user-space half of the data path.
//!
//! kernel programs → [`loader`] (with [`offsets`]) → [`decode`] → [`track`]
//! (→ [`classify`]) → [`metrics`] / [`http`], wired by [`run`].

pub mod attribution;
pub mod audit;
pub mod check;
pub mod classify;
pub mod cli;
pub mod decode;
pub mod http;
pub mod idle_timeout;
pub mod inventory;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod offsets;
pub mod run;
pub mod top;
pub mod track;
pub mod version;
