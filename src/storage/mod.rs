//! Object storage access and the file copy engine.
