//! The unid id logic as plain state machines. Time (`now`) and randomness are
//! passed in; nothing here reads a clock, a socket or a file.
#![forbid(unsafe_code)]
