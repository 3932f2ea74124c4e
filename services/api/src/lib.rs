//! flywheel-api
