mod download;
mod mock_hub;
