//! The subcommands that do more than start the server.

pub mod admin_client;
pub mod copy_table;
pub mod failback;
pub mod promote;
pub mod status;
