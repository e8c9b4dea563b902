//! Polling other trust domains' bundle endpoints.
