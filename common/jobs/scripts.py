"""The job store's Lua scripts: each change of a job's record that must not race another is one
script, run atomically by Redis (``common.jobs.store`` registers them).

- ``RECORD``: add a finished chunk's counts once (a redelivered chunk counts nothing), and end the
  job with its last chunk (returns 2: that caller sends the callback).
- ``START``: ``pending`` -> ``running``, once.
- ``CANCEL``: cancel a pending or running job, unless a training job is publishing its model.
- ``UPDATE``: set fields of a record that still exists (an expired job is not brought back).
- ``FINISH``: end a pending or running job; one that has already ended keeps its state.
"""

RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('EXPIREAT', KEYS[2], tonumber(redis.call('HGET', KEYS[1], 'expires_at')))
redis.call('HINCRBY', KEYS[1], 'done', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[3])
redis.call('HSET', KEYS[1], 'progress_at', ARGV[4])
redis.call('INCRBY', KEYS[3], ARGV[2])
redis.call('INCRBY', KEYS[4], ARGV[3])
if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[1], 'weights', ARGV[5]) end
local status = redis.call('HGET', KEYS[1], 'status')
local chunks = tonumber(redis.call('HGET', KEYS[1], 'chunks'))
if redis.call('SCARD', KEYS[2]) >= chunks and (status == 'pending' or status == 'running') then
  local final = 'completed'
  if tonumber(redis.call('HGET', KEYS[1], 'done')) == 0 then final = 'failed' end
  redis.call('HSET', KEYS[1], 'status', final, 'finished_at', ARGV[4])
  return 2
end
return 1
"""

START = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
return 1
"""

CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return nil end
if status == 'running' and redis.call('HGET', KEYS[1], 'phase') == 'publishing' then
  return 'publishing'
end
if status == 'pending' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  return 'cancelled'
end
return status
"""

UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'pending' and status ~= 'running' then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[2], unpack(ARGV, 3))
return ARGV[1]
"""
