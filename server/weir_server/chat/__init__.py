"""Chat requests: conversations and tools rendered into prompts, and each choice's output split into answer text,
reasoning and tool calls. Knows nothing of protobuf (api/ converts) nor of the engine (it only builds the
constraint the engine runs)."""
