"""One UML kernel on a simulation's clock: its command line and process (:mod:`.machine`),
what it may touch on the host (:mod:`.confine`), its console read in virtual time
(:mod:`.console`), and the guest agent's command channel (:mod:`.agent`, beside the
guest's own side, ``agent.sh``). Nothing here imports the simulation or the plugin: a
machine asks its host for what it needs through :class:`.machine.MachineHost`.
"""
