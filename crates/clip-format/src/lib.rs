//! The .clip index file: types, encoding, integrity checks
