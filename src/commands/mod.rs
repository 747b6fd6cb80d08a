//! One module per subcommand.

pub mod embed;
pub mod serve;
pub mod texts;
pub mod validate;
