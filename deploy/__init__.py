"""Running Agent Gateway on one machine: the dev stack and its demo agent."""
