//! api-notify library.
