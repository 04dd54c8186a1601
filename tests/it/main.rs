//! Integration tests: one binary (STYLE 12). Each test gets its own temp workspace.

mod cli;
mod common;
mod download;
mod evaluate;
mod forward;
mod mock_hub;
mod runner;
