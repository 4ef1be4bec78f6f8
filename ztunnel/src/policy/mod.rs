//! L4 authorization (placeholder: being written).
