//! Helpers shared by fedflow end-to-end tests.
