//! Embedded-mode authentication: a token file of `<node> <token>` lines.
