//! Client-side tools.
