"""headrace operators: WHAT a job is.

The user's API: operators, their declared state, and the job builder. Nothing in this
package performs I/O, touches Kafka or asyncio; :mod:`runtime` executes what is described here.
"""
