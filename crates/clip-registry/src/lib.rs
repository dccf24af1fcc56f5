//! Image references, credentials and blob sources: OCI registries and local OCI layouts
