"""Test helpers shared by every suite (scripted model server, ...)."""
