"""One UML kernel on a simulation's clock: the machine (:mod:`.machine`), how its process
is started and ended (:mod:`.launch`), what it may touch on the host (:mod:`.confine`), its
console read in virtual time (:mod:`.console`), and the guest agent's command channel
(:mod:`.channel`, with :mod:`.channel_console` and :mod:`.channel_files`; the agent's files
in :mod:`.agent`, beside the guest's own side, ``agent.sh``). Nothing here imports the
simulation or the plugin: a machine asks its host for what it needs through
:class:`.machine.MachineHost`.
"""
