//! One module per subcommand.

pub mod action;
pub mod convert;
pub mod embed;
pub mod index;
pub mod produce;
pub mod search;
pub mod serve;
pub mod soak;
pub mod texts;
pub mod validate;
