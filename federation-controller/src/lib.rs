//! The federation controller: cluster sources → registry → federation → xDS.
//!
//! Empty until the controller issue lands; the east-west gateway takes its
//! routes from a file or the command line meanwhile.
