//! Integration tests: one binary (STYLE 12). Each test gets its own temp workspace.

mod cli;
mod common;
mod download;
mod forward;
mod mock_hub;
mod prepare;
mod runner;
