//! Path rewriting of Iceberg metadata, manifests, delete files and puffin footers (pure, no I/O).
