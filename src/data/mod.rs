//! Data: the procedural demo world (and, later, dataset readers and few-shot splits).

pub mod world;
