//! flywheel-evaluator
