"""The session edge: owns each conversation and conducts the stages."""
