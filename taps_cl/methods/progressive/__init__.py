"""Progressive task-specific adaptation as one package: the method (`method`: adapters in a
shared, a group and a task band), the format of the shared artifacts its bands are stored in and
the groups a base's tasks form (`sharing`), how a new task joins a group (`joining`) and how
several new tasks are grouped and tied for training together (`grouping`)."""
