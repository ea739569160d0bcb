//! The subcommands that do more than start the server.

pub mod copy_table;
pub mod status;
