from pmoe_backdoor.jobs.defend import DefenseJob, defense_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    p = job.params
    spec = DefenseJob(p.defense, job.input.data, job.input.weights, job.wildcards.precision, job.run, dict(p.config),
                      p.calibration, p.target, dict(p.triggers), job.input.get("poison"))
    defense_job(spec, job.output.summary, job.output.artifacts, job.device)
