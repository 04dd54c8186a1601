//! Integration tests: one binary (STYLE 12). Each test gets its own temp workspace; those
//! that start from a state of the small pipeline get a copy of one built once per binary
//! (`small::copy_of`).

mod bench;
mod browser;
mod cli;
mod common;
mod disk;
mod download;
mod evaluate;
mod forward;
mod mock_hub;
mod parallel;
mod plan;
mod precision;
mod prepare;
mod quantize;
mod resume;
mod runner;
mod serve;
mod slice;
mod small;
mod trust;
