//! Iceberg REST catalogs as icerelay itself talks to them.
//!
//! - [`ident`]: namespace and table identifiers, in paths and in bodies.
//! - [`client`]: [`RestCatalog`], the operations icerelay performs on the
//!   primary and on replicas, each with its status codes interpreted.
//! - [`auth`]: icerelay's own credentials (none, bearer, OAuth2).
//! - [`error`]: [`CatalogError`] and its [`Disposition`] for replication lanes.
//!
//! The proxy does not use this client: engine requests are forwarded as they
//! are by `proxy::upstream`.

pub mod auth;
mod client;
mod error;
mod ident;
pub mod sigv4;

pub use client::{CatalogConfig, ClientSettings, LoadedTable, RestCatalog, TableCheck, TableCommit, table_property_in};
pub use error::{CatalogError, Disposition, SignerIdentity};
pub use ident::{Namespace, TableIdent};
