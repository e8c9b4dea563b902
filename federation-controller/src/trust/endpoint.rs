//! Serving our bundle to other trust domains.
