//! Integration tests: one binary (STYLE 12). Each test gets its own temp workspace.

mod cli;
mod common;
mod download;
mod mock_hub;
mod runner;
