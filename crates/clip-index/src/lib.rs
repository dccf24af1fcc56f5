//! Walks image layers' tar streams and merges them into a clip index
